"""The graph layer: import/export, walking every graph, weights, names, shapes, inspection."""
