"""jit benchmarks of jaxattn's implementations against the peers: `python -m bench`.

Modules: `specs` (named cases and presets), `peers` (every implementation and
how it expresses each mask), `runner` (timing, memory, errors; the command
line) and `report` (markdown table, JSON lines, plot).
"""
