"""Safe load and atomic save: external data, memory maps, tensor checks, output files."""
