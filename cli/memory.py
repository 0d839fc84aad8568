"""``nextstate memory``: the lessons the proxy's memory serves, read and changed in the
store (user -> CLI -> store -> the proxies' memory indexes, at their next look).

    nextstate memory list [--user U] [--tenant T] [--status S] [--json]
    nextstate memory add TEXT [--user U] [--tenant T] [--no-pin]
    nextstate memory edit ID TEXT
    nextstate memory pin ID [--off]
    nextstate memory forget ID | --user U | --tenant T

Users are named as ``nextstate export`` shows them (``tenant:id`` with client keys).
The same controls are on the proxy as ``/v1/memory`` (proxy/memory_admin.py), where a
client sees its own tenant only.
"""

from __future__ import annotations

import click
import orjson

from nextstate.cli.options import existing_store, store_option
from nextstate.core.store import Store
from nextstate.core.store.lessons import STATUSES, scope_label


@click.group()
def memory() -> None:
    """The lessons of the memory: list, add, edit, pin, forget."""


def _open(store: str | None) -> Store:
    return Store(existing_store(store))


@memory.command("list")
@store_option
@click.option("--user", default=None, help="Only this user's lessons.")
@click.option("--tenant", default=None, help="Only this tenant's (its users' and its own).")
@click.option("--status", type=click.Choice(STATUSES), default=None)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def list_lessons(store: str | None, user: str | None, tenant: str | None,
                 status: str | None, as_json: bool) -> None:
    """Lessons, newest first: who they are for, their state, how they did."""
    db = _open(store)
    try:
        rows = db.lessons.find(tenant=tenant, user=user, status=status,
                               every_tenant=tenant is None)
        handed = [r for r in db.handover.handed_over() if (tenant is None or r["tenant"]
                  == tenant) and (user is None or r["user"] == user)]
    finally:
        db.close()
    if as_json:
        for row in rows:
            click.echo(orjson.dumps(row).decode())
        return
    if not rows:
        click.echo("no lessons")
    else:
        click.echo(f"{'id':<32} {'for':<24} {'status':<8} {'pin':<3} {'served':>6} "
                   f"{'+1':>4} {'-1':>4}  text")
    for row in rows:
        scope = scope_label(row["tenant"], row["user"])
        click.echo(f"{row['id']:<32} {scope[:24]:<24} {row['status']:<8} "
                   f"{'yes' if row['pinned'] else '':<3} {row['served']:>6} "
                   f"{row['helped']:>4} {row['failed']:>4}  {row['text'][:60]}")
    for row in handed:  # whose active lessons are held back (but for a control share)
        click.echo(f"handed over to the weights: {scope_label(row['tenant'], row['user'])}: "
                   f"{row['reason']}")


@memory.command()
@store_option
@click.argument("text")
@click.option("--user", default=None, help="For this user (default: the tenant, or everyone).")
@click.option("--tenant", default=None, help="For this tenant's users.")
@click.option("--no-pin", is_flag=True,
              help="Serve it only to requests it fits, and let the learner retire it.")
def add(store: str | None, text: str, user: str | None, tenant: str | None,
        no_pin: bool) -> None:
    """A lesson written by hand (pinned: served on every request of its scope)."""
    db = _open(store)
    try:
        lesson_id = db.lessons.add(text, tenant=tenant, user=user, pinned=not no_pin)
    finally:
        db.close()
    if lesson_id is None:
        raise click.ClickException("nothing is left of that text once secrets are masked")
    click.echo(lesson_id)


@memory.command()
@store_option
@click.argument("lesson_id")
@click.argument("text")
def edit(store: str | None, lesson_id: str, text: str) -> None:
    """Change a lesson's text."""
    db = _open(store)
    try:
        found = db.lessons.edit(lesson_id, text=text)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        db.close()
    if found is None:
        raise click.ClickException(f"no lesson {lesson_id}")
    click.echo(f"{lesson_id}: {found['text']}")


@memory.command()
@store_option
@click.argument("lesson_id")
@click.option("--off", is_flag=True, help="Unpin it.")
def pin(store: str | None, lesson_id: str, off: bool) -> None:
    """Pin a lesson: served on every request of its scope, never retired or dropped."""
    db = _open(store)
    try:
        found = db.lessons.edit(lesson_id, pinned=not off,
                                status=None if off else "active")
    finally:
        db.close()
    if found is None:
        raise click.ClickException(f"no lesson {lesson_id}")
    click.echo(f"{lesson_id}: {'unpinned' if off else 'pinned'}")


@memory.command()
@store_option
@click.argument("lesson_id", required=False)
@click.option("--user", default=None, help="Forget every lesson of this user.")
@click.option("--tenant", default=None, help="Forget every lesson of this tenant.")
def forget(store: str | None, lesson_id: str | None, user: str | None,
           tenant: str | None) -> None:
    """Forget one lesson, or all of a user's or a tenant's, and whether they were handed
    over to the weights (their turns stay; `nextstate forget` forgets turns and the
    lessons learned from them)."""
    if (lesson_id is None) == (user is None and tenant is None):
        raise click.UsageError("give a lesson id, or --user or --tenant")
    db = _open(store)
    try:
        if lesson_id is not None:
            if not db.lessons.forget(lesson_id):
                raise click.ClickException(f"no lesson {lesson_id}")
            gone = 1
        else:
            rows = db.lessons.find(tenant=tenant, user=user, every_tenant=tenant is None)
            gone = sum(db.lessons.forget(row["id"]) for row in rows)
            db.handover.forget(tenant, user)  # their memory starts over: lessons served
    finally:
        db.close()
    click.echo(f"forgot {gone} lesson(s)")
