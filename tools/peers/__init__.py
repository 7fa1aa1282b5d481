"""The peers tfqkd is compared with: ``kerasio`` (the keras.io KD example's Distiller, on tfqkd's
Keras 2) and ``larq_rows.py`` (Larq ternary rows, a script run in Larq's own environment)."""
