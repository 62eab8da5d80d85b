"""The one sanctioned way to change a method of the user's LightningModule: on the instance, undone exactly.

Lightning gives callbacks no hook that can change the loss a ``training_step`` returns, so a
technique that must add to it (knowledge distillation) wraps the step on the module instance for the
length of a fit. :class:`InstancePatches` records what the instance held before (usually nothing: the
class's method shows through) and :meth:`~InstancePatches.restore` puts exactly that back, at teardown
or when the run fails.

Example:
    >>> class Module:
    ...     def step(self):
    ...         return 1
    >>> module, patches = Module(), InstancePatches()
    >>> patches.wrap(module, "step", lambda original: lambda: original() + 1)
    >>> module.step()
    2
    >>> patches.restore()
    >>> module.step(), "step" in vars(module)
    (1, False)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

_ABSENT = object()


class InstancePatches:
    """Methods wrapped on object instances, and what to put back."""

    def __init__(self) -> None:
        self._saved: list[tuple[Any, str, Any]] = []

    def wrap(self, obj: Any, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Replace ``obj.name`` by ``make(original bound method)`` on this instance only."""
        self._saved.append((obj, name, vars(obj).get(name, _ABSENT)))
        setattr(obj, name, make(getattr(obj, name)))

    def restore(self) -> None:
        """Undo every wrap, newest first; a second call does nothing."""
        while self._saved:
            obj, name, before = self._saved.pop()
            if before is _ABSENT:
                vars(obj).pop(name, None)
            else:
                setattr(obj, name, before)

    @property
    def active(self) -> bool:
        return bool(self._saved)
