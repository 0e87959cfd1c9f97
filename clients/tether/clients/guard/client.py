"""A thin client of tether.guard.v1.FingerprintGuard for internal callers and
web front-ends' back-ends. Methods take plain values and return the
generated messages; errors surface as grpc.aio.AioRpcError (read them with
tether.clients.errors.details_of)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format

from tether.clients.paging import every
from tether.common.v1 import types_pb2
from tether.guard.v1 import messages_pb2 as pb
from tether.guard.v1.service_pb2_grpc import FingerprintGuardStub

ACTIONS = {
    "register": pb.ACTION_REGISTER,
    "login": pb.ACTION_LOGIN,
    "collaborate": pb.ACTION_COLLABORATE,
}
ACCOUNT_KINDS = {
    "phone_number": types_pb2.ACCOUNT_KIND_PHONE_NUMBER,
    "member_id": types_pb2.ACCOUNT_KIND_MEMBER_ID,
    "email": types_pb2.ACCOUNT_KIND_EMAIL,
    "social_id": types_pb2.ACCOUNT_KIND_SOCIAL_ID,
    "login_id": types_pb2.ACCOUNT_KIND_LOGIN_ID,
}


def account(value: str, kind: str = "login_id", region_hint: str = "") -> types_pb2.Account:
    return types_pb2.Account(kind=ACCOUNT_KINDS[kind], value=value, region_hint=region_hint)


def components(fields: Mapping[str, Any]) -> pb.FingerprintComponents:
    """Components from a dict keyed by proto field names (what collector.js sends)."""
    return json_format.ParseDict(dict(fields), pb.FingerprintComponents())


class GuardClient:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stub = FingerprintGuardStub(channel)

    async def evaluate(
        self,
        service_id: str,
        action: str,
        account: types_pb2.Account,
        fingerprint: pb.FingerprintComponents,
        client_ip: str,
        *,
        room_id: str = "",
    ) -> pb.EvaluateResponse:
        return await self.stub.Evaluate(
            pb.EvaluateRequest(
                service_id=service_id,
                action=ACTIONS[action],
                account=account,
                components=fingerprint,
                client_ip=client_ip,
                room_id=room_id,
            )
        )

    async def cancel_registration(
        self, service_id: str, identity: str, account: types_pb2.Account
    ) -> bool:
        response = await self.stub.CancelRegistration(
            pb.CancelRegistrationRequest(service_id=service_id, identity=identity, account=account)
        )
        return response.cancelled

    async def end_login(self, service_id: str, identity: str, account: types_pb2.Account) -> bool:
        response = await self.stub.EndLogin(
            pb.EndLoginRequest(service_id=service_id, identity=identity, account=account)
        )
        return response.ended

    async def renew_login(
        self, service_id: str, identity: str, account: types_pb2.Account
    ) -> pb.RenewLoginResponse:
        return await self.stub.RenewLogin(
            pb.RenewLoginRequest(service_id=service_id, identity=identity, account=account)
        )

    async def leave_room(
        self, service_id: str, room_id: str, identity: str, account: types_pb2.Account
    ) -> bool:
        response = await self.stub.LeaveRoom(
            pb.LeaveRoomRequest(
                service_id=service_id, room_id=room_id, identity=identity, account=account
            )
        )
        return response.left

    async def get_policy(self, service_id: str) -> pb.Policy:
        return (await self.stub.GetPolicy(pb.GetPolicyRequest(service_id=service_id))).policy

    def list_policies(self) -> AsyncIterator[pb.Policy]:
        return every(
            lambda token: self.stub.ListPolicies(
                pb.ListPoliciesRequest(page_size=500, page_token=token)
            ),
            lambda page: page.policies,
        )

    async def set_policy(
        self,
        policy: pb.Policy,
        *,
        only: Iterable[str] = (),
        allowed_accounts: Iterable[types_pb2.Account] = (),
    ) -> pb.Policy:
        """Replaces the policy, or with `only` changes just the named fields."""
        response = await self.stub.SetPolicy(
            pb.SetPolicyRequest(
                policy=policy,
                allowed_accounts=list(allowed_accounts),
                update_mask=field_mask_pb2.FieldMask(paths=list(only)),
            )
        )
        return response.policy

    def identity_accounts(
        self, identity: str, service_id: str = ""
    ) -> AsyncIterator[pb.IdentityLink]:
        """Every link of an identity, newest first, page after page."""
        return every(
            lambda token: self.stub.ListIdentityAccounts(
                pb.ListIdentityAccountsRequest(
                    identity=identity, service_id=service_id, page_size=500, page_token=token
                )
            ),
            lambda page: page.links,
        )

    def account_identities(
        self, account: types_pb2.Account, service_id: str = ""
    ) -> AsyncIterator[pb.IdentityLink]:
        """Every link of an account, newest first, page after page."""
        return every(
            lambda token: self.stub.ListAccountIdentities(
                pb.ListAccountIdentitiesRequest(
                    account=account, service_id=service_id, page_size=500, page_token=token
                )
            ),
            lambda page: page.links,
        )

    async def rebuild(self, service_id: str = "") -> int:
        response = await self.stub.RebuildCounters(pb.RebuildCountersRequest(service_id=service_id))
        return response.entries_restored
