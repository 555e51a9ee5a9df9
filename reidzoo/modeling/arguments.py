"""Argument checks shared by the config path and the explicit path of paper components.

A component built with fast-reid's ``@configurable`` can be made from explicit keyword
arguments (``PANHead(feat_dim=512, num_classes=10)``) or from a config (``PANHead(cfg)``, which
calls ``from_config``). Both paths run the same checks; an error should name what the caller
wrote: the argument on the explicit path, the config key on the config path. A check raises
:class:`ArgumentError` naming arguments; ``from_config`` runs the checks inside
:func:`config_keys`, which turns that error into one naming the keys.
"""

import contextlib

__all__ = ["ArgumentError", "arguments_of", "check_choice", "config_keys", "read_keys"]


class ArgumentError(ValueError):
    """A wrong value of one or more constructor arguments.

    Args:
        owner (str): what was being built, e.g. "PANHead".
        values (dict[str, object]): argument name -> the value given (the arguments at fault).
        detail (str): what was expected. ``{name}`` in it (a name of ``values``) is replaced by
            the argument's name, or by its config key under :func:`config_keys`.
    """

    def __init__(self, owner, values, detail):
        self.owner = owner
        self.values = dict(values)
        self.detail = detail
        super().__init__(self.render())

    def render(self, keys=None):
        """The message, arguments named by ``keys`` where given.

        Args:
            keys (dict[str, str] | None): argument name -> config key.
        Returns:
            str: ``"owner: arg=value; detail"``, or ``"KEY=value; detail"`` when every
            argument at fault has a key.
        """
        keys = keys or {}
        keyed = all(name in keys for name in self.values)
        labels = {name: keys[name] if keyed else name for name in self.values}
        detail = self.detail
        for name, label in labels.items():
            detail = detail.replace("{" + name + "}", label)
        shown = ", ".join(f"{labels[name]}={value!r}" for name, value in self.values.items())
        return f"{shown}; {detail}" if keyed else f"{self.owner}: {shown}; {detail}"


def check_choice(owner, name, value, allowed):
    """Raise :class:`ArgumentError` unless ``value`` is one of ``allowed``.

    Args:
        owner (str): the component, e.g. "PANHead".
        name (str): the argument.
        value: its value.
        allowed (Sequence): the accepted values.
    """
    if value not in allowed:
        raise ArgumentError(owner, {name: value}, f"expected one of {tuple(allowed)}")


@contextlib.contextmanager
def config_keys(keys):
    """Context of a ``from_config``: argument errors raised inside name config keys instead.

    Args:
        keys (dict[str, str]): argument name -> config key, e.g. ``{"parts": "MODEL.PAN.PARTS"}``.
    Raises:
        ValueError: for an :class:`ArgumentError` inside, with the message naming the keys
            (``"MODEL.PAN.PARTS='grid'; expected one of ('plm', 'stripes')"``).
    """
    try:
        yield
    except ArgumentError as e:
        raise ValueError(e.render(keys)) from e


def arguments_of(frame_locals):
    """A constructor's arguments from its ``locals()``, taken as its first statement.

    Args:
        frame_locals (dict): ``locals()`` of ``__init__`` before anything else is assigned.
    Returns:
        dict[str, object]: argument name -> value, without ``self`` and the ``__class__``
        cell Python adds where ``super()`` is used.
    """
    return {k: v for k, v in frame_locals.items() if k not in ("self", "__class__")}


def read_keys(cfg, keys):
    """Values of dotted config keys, by argument name.

    Args:
        cfg (CfgNode): root config.
        keys (dict[str, str]): argument name -> dotted key, e.g. ``"MODEL.PAN.PARTS"``.
    Returns:
        dict[str, object]: argument name -> the key's value.
    Raises:
        KeyError: a key the config lacks, named (its paper's config node was not added).
    """
    out = {}
    for name, key in keys.items():
        node = cfg
        for part in key.split("."):
            if not hasattr(node, "keys") or part not in node:
                raise KeyError(
                    f"config has no key {key}: the config node that defines it was not added "
                    "(list the paper's package in REIDZOO.CUSTOM_IMPORTS, or build the config "
                    "with reidzoo.config.get_cfg(imports=[...]))"
                )
            node = node[part]
        out[name] = node
    return out


def arguments_from_config(cfg, keys, check, **given):
    """The body of a component's ``from_config``: its config keys read, merged with the
    arguments the caller gives, and checked with config-key error messages.

    Args:
        cfg (CfgNode): root config.
        keys (dict[str, str]): argument name -> dotted key (the component's ``CONFIG_KEYS``).
        check (callable): ``check(args)``, the component's ``check_arguments``; it may see
            extra entries the constructor does not take (pass them in ``given`` and drop them).
        **given: arguments that do not come from the config (``channels``, ``parts``, ...).
    Returns:
        dict[str, object]: ``given`` and the keys' values, by argument name.
    Raises:
        KeyError: a key the config lacks. ValueError: a wrong value, naming its key.
    """
    args = {**given, **read_keys(cfg, keys)}
    with config_keys(keys):
        check(args)
    return args
