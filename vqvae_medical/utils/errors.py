"""User errors: exceptions whose message already says what is wrong and what to do, which the bundles' error hook
(:func:`~vqvae_medical.training.runtime.install_error_hook`) prints in one line instead of a traceback."""

from __future__ import annotations

__all__ = ["UserError", "register_user_error", "user_error_types"]


class UserError(Exception):
    """Base class of the package's user errors (``DataError``, ``CheckpointError``, ``SettingError``, ...): a
    subclass is a user error by definition, so no module needs to register it and none is looked up by name."""


#: exception types registered with :func:`register_user_error` (besides :class:`UserError` and its subclasses)
_REGISTERED: list[type[BaseException]] = [UserError]


def register_user_error(cls: type[BaseException]) -> type[BaseException]:
    """Register ``cls`` (and its subclasses) as a user error when it cannot subclass :class:`UserError` (e.g. an
    exception type of another library). Usable as a class decorator; returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, BaseException)):
        raise TypeError(f"register_user_error expects an exception class, got {cls!r}.")
    if cls not in _REGISTERED:
        _REGISTERED.append(cls)
    return cls


def user_error_types() -> tuple[type[BaseException], ...]:
    """The user-error types: :class:`UserError` and the registered ones. The hook checks ``isinstance``, never a
    class name (another library's ``DataError`` is not ours)."""
    return tuple(_REGISTERED)
