"""Detector for cross-entropies no loss pattern took (a silent miss is a bug).

What a cross-entropy is, by data flow: `nll_loss` of a log-softmax over the classes.  The loss
patterns read it with no cast between the two (the fused kernels give the log-probabilities
before any rounding); with a cast there (a log-softmax rounded through fp16, or cast through an
integer type) the patterns do not match at all, so the detector reports it, naming the casts.
Without a cast in between the patterns match and report their own refusals.
"""

from __future__ import annotations

from ligerfx.compiler.canonical import CNode
from ligerfx.compiler.detect import fx_nodes, op, register_detector

from .logprob_detect import _message, _through_casts


def detect_cross_entropy(view):
    for c in view.cnodes():
        if op(c) != "nll_loss" or not c.nodes or not c.args:
            continue
        src, casts = _through_casts(c.args[0])
        if not casts or not (isinstance(src, CNode) and op(src) == "log_softmax"):
            continue
        yield c.nodes[0], fx_nodes(c, *casts, src), _message(casts, "log-softmax", "nll_loss")


register_detector("cross_entropy", detect_cross_entropy,
                  patterns=("cross_entropy", "fused_linear_cross_entropy"),
                  looks_like="a cross-entropy (nll_loss of a log-softmax)")
