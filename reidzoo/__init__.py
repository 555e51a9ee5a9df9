"""reidzoo: five person re-identification papers as fast-reid components."""

__version__ = "0.1.0"

try:
    import fastreid  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "reidzoo needs fastreid 1.4.0, installed without its stale torch pin: "
        "`pip install --no-deps fastreid==1.4.0` (scripts/install.sh does this)."
    ) from e

from reidzoo import compat  # noqa: E402

# The one place the compatibility fixes are applied: every reidzoo module is imported through
# this package, before it imports fast-reid's submodules (torch._six, collections.Mapping).
# They are only version-guarded repairs; README "fast-reid 1.4.0 on today's torch" lists them.
compat.apply()


def __getattr__(name):
    # Lazy, so that `import reidzoo` does not build transforms or import the model code.
    if name == "FeatureExtractor":
        from reidzoo.inference import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'reidzoo' has no attribute '{name}'")
