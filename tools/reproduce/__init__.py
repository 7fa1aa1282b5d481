"""The reproduction benchmark's pieces (``tools/reproduce_cpu.py`` is its command line).

``rows.py``: the benchmark's rows (:data:`rows.METHODS`: hard labels, KD, KD + CR, QKD, SPEQ),
the :class:`rows.Context` they train from and the KD settings of the KD rows
(:data:`rows.BENCHMARK_KD`). The recipes know nothing of the benchmark; its rows build their
configurations from the recipes' own ``make_config`` and run the recipes' ``run``.
"""
