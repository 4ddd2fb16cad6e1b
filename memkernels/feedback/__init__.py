"""Random feedback training: FA, DFA and MEM-DFA, with feedback matrices generated on the fly.

    trainer = mk.feedback.Trainer(model, rule="memdfa", loss=F.cross_entropy, optimizer=opt, seed=0)
    loss = trainer.step(x, y)
    layer = mk.nn.FALinear(256, 128, seed=0, layer=3)      # feedback alignment outside a trainer

The feedback matrices are never stored: memkernels.ops.feedback_project regenerates them from
Philox (memkernels.reference.feedback_matrix is the rule) and multiplies in the same pass.
"""
from memkernels.feedback.layers import FAConv2d, FALinear, fa_conv2d, fa_linear
from memkernels.feedback.trainer import RULES, Block, Trainer, split_blocks
from memkernels.reference import feedback_matrix

__all__ = ["Trainer", "RULES", "Block", "split_blocks", "FALinear", "FAConv2d", "fa_linear", "fa_conv2d",
           "feedback_matrix"]
