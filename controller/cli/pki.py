"""`corral pki ...`: the fleet's certificate authority and certificates: make them, list them
with their ends (`ls` exits 5 when one has ended or ends within --warn-days), renew them."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from controller.cli import output
from controller.cli.command import group
from controller.cli.context import run

EXPIRING_EXIT = 5  # `pki ls`: some certificate has ended or ends within --warn-days ("wrong state")
_DAYS = click.IntRange(1, 3650)


@group(examples=["corral pki init --dir pki", "corral pki issue --dir pki --role user --name alice",
                 "corral pki ls --dir pki", "corral pki renew --dir pki --all-expiring"])  # fmt: skip
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
@click.option("--days", type=_DAYS, default=365, show_default=True, help="validity (never past the CA's end)")
def pki_issue(pki_dir: Path, role: str, name: str, hosts: tuple[str, ...], days: int) -> None:
    """Issue a certificate signed by the fleet CA in DIR."""
    import datetime

    from corral import pki as corral_pki

    @run
    async def go():
        paths = corral_pki.issue(pki_dir, role, name, hosts, datetime.timedelta(days=days))
        click.echo(f"issued {role} certificate {paths.cert} (key {paths.key})")

    go()


def _row(info, warn_days: int) -> dict:
    return {"name": info.name, "role": info.role, "hosts": list(info.hosts), "file": str(info.path),
            "valid_until": output.rfc3339(info.not_after.timestamp()), "days_left": int(info.days_left() // 1),
            "state": info.state(warn_days)}  # fmt: skip


@pki.command("ls", examples=[
    "corral pki ls --dir /etc/corral/pki",
    "corral pki ls --dir pki --warn-days 60 -o json",
    "corral pki ls --dir pki || corral pki renew --dir pki --all-expiring",
])
@click.option("--dir", "pki_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--warn-days", type=click.IntRange(0, 3650), default=30, show_default=True,
              help="a certificate ending within this many days counts as expiring")
@click.pass_obj
def pki_ls(obj, pki_dir: Path, warn_days: int) -> None:
    """List the certificates in DIR: role, name, hosts, end, days left.

    Exits 0 when every one is valid for more than --warn-days, 5 when one has ended or ends
    within them (for cron jobs and monitoring).
    """
    from corral import pki as corral_pki

    @run
    async def go():
        rows = [_row(c, warn_days) for c in corral_pki.list_certificates(pki_dir)]
        if obj.machine:
            output.emit(obj, rows)
        else:
            output.print_table(["NAME", "ROLE", "HOSTS", "VALID UNTIL", "DAYS LEFT", "STATE"], [
                [r["name"], r["role"], ",".join(r["hosts"]) or "-", r["valid_until"][:10], r["days_left"], r["state"]]
                for r in rows], no_headers=obj.no_headers)  # fmt: skip
        due = [r for r in rows if r["state"] != "ok"]
        if due:
            names = ", ".join(f"{r['role']} {r['name']}" for r in due)
            click.echo(f"corral: {len(due)} of {len(rows)} certificates ended or end within {warn_days} days: "
                       f"{names}", err=True)  # fmt: skip
        return EXPIRING_EXIT if due else 0

    sys.exit(go())


@pki.command("renew", examples=[
    "corral pki renew --dir pki --role agent --name n1",
    "corral pki renew --dir pki --all-expiring --warn-days 60",
])
@click.option("--dir", "pki_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--role", type=click.Choice(["controller", "agent", "user"]), help="with --name: the one to renew")
@click.option("--name", help="with --role: the one to renew")
@click.option("--all-expiring", is_flag=True, help="renew every certificate that `pki ls` says ended or is expiring")
@click.option("--warn-days", type=click.IntRange(0, 3650), default=30, show_default=True,
              help="with --all-expiring: what counts as expiring")
@click.option("--days", type=_DAYS, default=365, show_default=True, help="validity (never past the CA's end)")
def pki_renew(pki_dir: Path, role: str | None, name: str | None, all_expiring: bool, warn_days: int,
              days: int) -> None:  # fmt: skip
    """A new key and certificate with the role, name and hosts of the current one.

    The files in DIR are replaced; install them and restart the daemon that uses them (it reads
    its certificate at start). The old certificate stays valid until it ends. The CA itself is
    not renewed (no CA rollover yet; deploy/GUIDE.md).
    """
    import datetime

    from corral import pki as corral_pki
    from corral.errors import InvalidArgument

    @run
    async def go():
        if all_expiring == bool(role or name) or (not all_expiring and not (role and name)):
            raise InvalidArgument("give --role and --name, or --all-expiring")
        if all_expiring:
            certs = corral_pki.list_certificates(pki_dir)
            for ca in (c for c in certs if c.role == corral_pki.CA_ROLE and c.state(warn_days) != "ok"):
                click.echo(f"corral: the CA {ca.path} ends {ca.not_after:%Y-%m-%d}: it cannot be renewed here "
                           "(deploy/GUIDE.md, Certificates)", err=True)  # fmt: skip
            wanted = [(c.role, c.name) for c in certs if c.role in corral_pki.ROLES and c.state(warn_days) != "ok"]
            if not wanted:
                click.echo(f"nothing to renew: every certificate in {pki_dir} is valid for more than {warn_days} days")
        else:
            wanted = [(role, name)]
        for r, n in wanted:
            paths = corral_pki.renew(pki_dir, r, n, datetime.timedelta(days=days))
            info = corral_pki.certificate_info(paths.cert)
            click.echo(f"renewed {r} certificate {paths.cert} (key {paths.key}), valid until "
                       f"{info.not_after:%Y-%m-%d}, hosts: {', '.join(info.hosts) or '-'}")  # fmt: skip

    go()
