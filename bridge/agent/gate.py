"""Credential gating: what a job may use, and only once this MID is validated."""

from __future__ import annotations

from bridge.agent.identity import Identity
from bridge.wire.credentials import Credential, of_types
from bridge.wire.errors import CredentialError, Refused
from bridge.wire.records import OutputRecord
from probes.contract import CredentialResolver


class CredentialGate:
    """A job's credentials: sealed in its record for this bridge, then the local file.

    Nothing is handed out until the MID is validated (unless the configuration says
    validation is not required). Decrypted secrets live only in the returned objects.
    """

    def __init__(
        self, identity: Identity, local: CredentialResolver, *, require_validation: bool
    ) -> None:
        self.identity = identity
        self.local = local
        self.require_validation = require_validation

    def open(self) -> bool:
        """May jobs use credentials now?"""
        return not self.require_validation or self.identity.validated

    def refusal(self) -> Refused:
        return Refused(
            "this MID is not validated: jobs that need credentials are refused until an "
            f"administrator validates key {self.identity.fingerprint[:16]}...",
            field="credentials",
        )

    async def resolve(
        self, record: OutputRecord, *, credential_id: str | None, types: tuple[str, ...]
    ) -> list[Credential]:
        if not self.open():
            raise self.refusal()
        sealed = [
            self.identity.decrypt_credential(item, sys_id=record.sys_id)
            for item in record.credentials
        ]
        if credential_id is not None:
            for cred in sealed:
                if cred.id == credential_id:
                    return [of_types(cred, credential_id, types)]
            return await self.local.resolve(record, credential_id=credential_id, types=types)
        found = [cred for cred in sealed if cred.type in types]
        try:
            found += await self.local.resolve(record, credential_id=None, types=types)
        except CredentialError:
            if not found:
                raise
        return found
