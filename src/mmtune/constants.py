"""Values every layer shares."""

#: label of a position that carries no loss (transformers' and PyTorch's cross-entropy default)
IGNORE_INDEX = -100
