"""RESTProbe: HTTP(S) requests (``probe``), its parameters and settings (``params``), and
the bridge's shared client (``client``)."""

from probes.http.client import HttpClient
from probes.http.params import TOPIC, RESTParams, RESTSettings, build_params
from probes.http.probe import SPEC

__all__ = ["SPEC", "TOPIC", "HttpClient", "RESTParams", "RESTSettings", "build_params"]
