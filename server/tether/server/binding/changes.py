"""The binding area's change hook: who is told of every binding created or
revoked, inside the transaction that made the change.

app.py hands it to the areas that listen (provisioning's outbox) before
the server starts; the reports and unbinds read `listeners` on each call.
"""

from __future__ import annotations

from tether.server.shared.bindings import BindingListener


class BindingChanges:
    def __init__(self) -> None:
        self._listeners: tuple[BindingListener, ...] = ()

    def listen(self, listener: BindingListener) -> None:
        """Adds a listener, told after those added before it."""
        self._listeners = (*self._listeners, listener)

    def forget(self, listener: BindingListener) -> None:
        """Removes a listener; later changes no longer reach it."""
        self._listeners = tuple(x for x in self._listeners if x is not listener)

    @property
    def listeners(self) -> tuple[BindingListener, ...]:
        return self._listeners
