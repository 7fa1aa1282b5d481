"""tfqkd's command-line recipes, installed with the library (``pip install .``).

Each recipe is a script (``python recipes/train_teacher.py --help``), a module
(``python -m recipes.train_teacher``) and a console command (``tfqkd-train-teacher``):
``train_teacher``, ``train_student``, ``quantize_distill``, ``qkd``, ``speq``, ``sweep`` and
``quickstart``. What they share lives in :mod:`recipes.common`; no recipe imports another.
"""
