"""ImageNet's channel mean and std: the normalisation of a model whose own config names none.

Their one home, so that the MAE (which must not depend on the features backbones) and the backbones
agree without importing each other.
"""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
