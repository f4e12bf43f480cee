"""Graph passes, one module per pass. Importing this package registers every pass."""

from passes import (  # noqa: F401  (registers the passes)
    cleanup,
    cluster,
    constants_to_initializers,
    prune,
    prune_channels,
    quantize,
    share,
)
