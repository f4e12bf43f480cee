"""Graph passes, one module per pass. Importing this package registers every pass."""

from passes import cleanup, constants_to_initializers  # noqa: F401  (registers the passes)
