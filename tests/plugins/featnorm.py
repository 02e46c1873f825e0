"""A detector plugin as a user would write one, outside featcache: one file, one method.

featnorm scores a sample by minus the L^p norm of its penultimate features, -||x||_p (large
activations are typical of OOD inputs on ReLU networks); the prediction is the cached logits' argmax.
"""

import numpy as np

import featcache
from featcache.methods import Output


@featcache.register("featnorm", defaults={"p": 2.0}, paper={"cifar10": {"p": 2.0}}, version=1)
def featnorm(data, head, fit, p):
    x = np.abs(np.asarray(data.features, dtype=np.float64))
    return Output(-(x ** p).sum(axis=1) ** (1.0 / p), data.logits.argmax(axis=1))
