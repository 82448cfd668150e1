"""UltraEdit (Gu et al., 2025): training-free lifelong editing by closed-form weight shifts.

Each turn of edits is read once: at the answer positions, every edited linear layer's
inputs (keys) and the loss gradient at its outputs are recorded; both are normalised with
statistics carried over every turn so far ("lifelong normalisation"), turned into target
output shifts, and a ridge least-squares solve gives the weight shift, added in place.
Nothing is routed: the edited model is a plain model.
"""
