"""Graph passes, one package per family. Importing this package registers every pass."""

from passes import cleanup, constants_to_initializers  # noqa: F401  (registers the passes)
from passes.precision import float16  # noqa: F401
from passes.prune import channels, prune_pass  # noqa: F401
from passes.quantize import quantize_pass  # noqa: F401
from passes.share import cluster, share_pass  # noqa: F401
