"""End-to-end demo: K-FAC, EKFAC, TKFAC and TEKFAC against momentum SGD and AdamW on
scikit-learn's digits (a deep autoencoder and a small CNN).

Run ``python -m kfac_cuda.demo --help``. Modules: :mod:`.tasks` (data, models, losses),
:mod:`.methods` (optimizers and tuned learning rates), :mod:`.train` (the timed training
loop), :mod:`.report` (table and plot), :mod:`.cli` (argument parsing).
"""
