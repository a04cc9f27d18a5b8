"""midbridge: a MID Server bridge that carries the ECC queue over MQTT 5."""

import warnings
from importlib import metadata

try:  # one version source: pyproject.toml's, as installed
    __version__ = metadata.version("midbridge")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

# cryptography >= 47 deprecates DSA, and asyncssh (2.24) touches its DSA classes while it
# is imported: five warnings before any command's own output. Silence exactly that warning
# from asyncssh's modules; every other warning, DSA ones from other code included, stays.
warnings.filterwarnings(
    "ignore",
    message="DSA is deprecated",
    category=UserWarning,  # CryptographyDeprecationWarning's base; not imported here
    module=r"asyncssh(\.|$)",
)
