"""`corral pki ...`: the fleet's certificate authority and certificates."""

from __future__ import annotations

from pathlib import Path

import click

from controller.cli.command import group
from controller.cli.context import run


@group(examples=["corral pki init --dir pki", "corral pki issue --dir pki --role user --name alice"])
def pki() -> None:
    """Certificates for mutual TLS between every part of the fleet."""


@pki.command("init", examples=["corral pki init --dir /etc/corral/pki"])
@click.option("--dir", "pki_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--cn", default="Corral fleet CA", help="the CA's common name")
def pki_init(pki_dir: Path, cn: str) -> None:
    """Create the fleet CA in DIR (ca.crt, ca.key)."""
    from corral import pki as corral_pki

    @run
    async def go():
        ca = corral_pki.init_ca(pki_dir, cn)
        click.echo(f"created CA {ca}")

    go()


@pki.command("issue", examples=[
    "corral pki issue --dir pki --role controller --name controller --host 10.0.0.1",
    "corral pki issue --dir pki --role agent --name n1 --host 10.0.0.5",
    "corral pki issue --dir pki --role user --name alice",
])
@click.option("--dir", "pki_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--role", type=click.Choice(["controller", "agent", "user"]), required=True)
@click.option("--name", required=True, help="node name for agents, user name for users, 'controller' for the controller")
@click.option("--host", "hosts", multiple=True, help="extra DNS name or IP address for the certificate (repeatable)")
def pki_issue(pki_dir: Path, role: str, name: str, hosts: tuple[str, ...]) -> None:
    """Issue a certificate signed by the fleet CA in DIR."""
    from corral import pki as corral_pki

    @run
    async def go():
        paths = corral_pki.issue(pki_dir, role, name, hosts)
        click.echo(f"issued {role} certificate {paths.cert} (key {paths.key})")

    go()
