"""tether-admin commands: partners, services, credentials."""

from __future__ import annotations

import argparse
import secrets
from typing import Any

import grpc

from tether.admin.v1 import messages_pb2 as pb
from tether.admin.v1.service_pb2_grpc import AdminStub
from tether.clients.cli import print_message
from tether.clients.paging import every

POLICIES = {"refuse": pb.REBIND_POLICY_REFUSE, "move": pb.REBIND_POLICY_MOVE}
KINDS = {
    "device": pb.CREDENTIAL_KIND_DEVICE,
    "partner": pb.CREDENTIAL_KIND_PARTNER,
    "internal": pb.CREDENTIAL_KIND_INTERNAL,
    "admin": pb.CREDENTIAL_KIND_ADMIN,
}


def add_commands(sub: Any) -> None:
    p = sub.add_parser("create-partner", help="register a partner (third party)")
    p.add_argument("partner_id")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--rebind", choices=POLICIES, default="refuse", help="rebind policy")
    p.set_defaults(handler=create_partner)

    p = sub.add_parser("partners", help="list partners")
    p.set_defaults(handler=list_partners)

    p = sub.add_parser("set-rebind", help="change a partner's rebind policy")
    p.add_argument("partner_id")
    p.add_argument("policy", choices=POLICIES)
    p.set_defaults(handler=set_rebind)

    p = sub.add_parser("create-service", help="add a preset service to a partner")
    p.add_argument("partner_id")
    p.add_argument("service_id")
    p.add_argument("--name", required=True, help="display name")
    p.add_argument("--description", default="")
    p.set_defaults(handler=create_service)

    p = sub.add_parser("create-credential", help="issue a credential; prints its token once")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--partner", default="", help="the partner, for partner credentials")
    p.add_argument("--label", default="")
    p.add_argument(
        "--client-subject",
        default="",
        help="accept the token only with a client certificate of this subject "
        "(mutual TLS), e.g. 'CN=acme-backend,O=ACME'",
    )
    p.add_argument("--token-only", action="store_true", help="print just the token")
    p.set_defaults(handler=create_credential, flags={"client_subject": "--client-subject"})

    p = sub.add_parser("credentials", help="list credentials")
    p.add_argument("--partner", default="")
    p.set_defaults(handler=list_credentials)

    p = sub.add_parser("revoke-credential", help="revoke a credential")
    p.add_argument("credential_id")
    p.set_defaults(handler=revoke_credential)


async def create_partner(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    response = await AdminStub(channel).CreatePartner(
        pb.CreatePartnerRequest(
            request_id=secrets.token_hex(8),
            partner_id=args.partner_id,
            display_name=args.name,
            rebind_policy=POLICIES[args.rebind],
        )
    )
    print_message(response.partner)


async def list_partners(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    stub = AdminStub(channel)
    async for partner in every(
        lambda token: stub.ListPartners(pb.ListPartnersRequest(page_size=500, page_token=token)),
        lambda page: page.partners,
    ):
        print_message(partner)


async def set_rebind(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    response = await AdminStub(channel).UpdatePartner(
        pb.UpdatePartnerRequest(partner_id=args.partner_id, rebind_policy=POLICIES[args.policy])
    )
    print_message(response.partner)


async def create_service(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    response = await AdminStub(channel).CreateService(
        pb.CreateServiceRequest(
            request_id=secrets.token_hex(8),
            partner_id=args.partner_id,
            service_id=args.service_id,
            display_name=args.name,
            description=args.description,
        )
    )
    print_message(response.service)


async def create_credential(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    response = await AdminStub(channel).CreateCredential(
        pb.CreateCredentialRequest(
            kind=KINDS[args.kind],
            partner_id=args.partner,
            label=args.label,
            client_subject=args.client_subject,
        )
    )
    if args.token_only:
        print(response.token)
    else:
        print_message(response)


async def list_credentials(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    stub = AdminStub(channel)
    async for credential in every(
        lambda token: stub.ListCredentials(
            pb.ListCredentialsRequest(partner_id=args.partner, page_size=500, page_token=token)
        ),
        lambda page: page.credentials,
    ):
        print_message(credential)


async def revoke_credential(args: argparse.Namespace, channel: grpc.aio.Channel) -> None:
    response = await AdminStub(channel).RevokeCredential(
        pb.RevokeCredentialRequest(credential_id=args.credential_id)
    )
    print_message(response.credential)
