"""``FocalSSDHead``: mmdet's SSD head with a configurable classification loss (the Focal Loss
family) over all anchors, instead of softmax cross-entropy with hard negative mining.

mmdet 3.3's ``SSDHead`` has no ``loss_cls`` option: ``loss_by_feat_single`` hard-codes
``F.cross_entropy`` over ``num_classes + 1`` softmax outputs and keeps the ``neg_pos_ratio`` (3)
hardest negatives per positive. Focal Loss (Lin et al., 2017) replaces that sampling: every anchor
contributes, easy negatives are down-weighted by the modulating factor, and the sum is normalised
by the number of positive anchors. This head therefore

* predicts ``num_classes`` sigmoid logits per anchor (no background channel), as RetinaNet does;
* computes ``loss_cls`` (any mmdet loss with the ``FocalLoss`` interface: ``FocalLoss``,
  ``ShiftStepFocalLoss``, ``FocalFamilyLoss``...) over all anchors with their label weights and
  ``avg_factor`` = number of positive anchors (``PseudoSampler``); no hard negative mining;
* keeps SSD's anchors, assigner, box coder and Smooth-L1 box loss unchanged;
* initialises the classification convs' bias to the prior ``-log((1 - p) / p)`` (``prior_prob``,
  0.01 as in RetinaNet) so that training starts with low foreground scores on every anchor;
* with ``loss_cls=None`` behaves exactly as ``SSDHead`` (softmax CE + hard negative mining).

Importing this module registers ``FocalSSDHead`` into mmdet's ``MODELS``; a config selects it with
``custom_imports = dict(imports=['ssflctl.extensions.heads'])`` and ``model.bbox_head.type='FocalSSDHead'``.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from mmdet.models.dense_heads.ssd_head import SSDHead
from mmdet.models.losses import smooth_l1_loss
from mmdet.registry import MODELS

__all__ = ["FocalSSDHead"]


@MODELS.register_module()
class FocalSSDHead(SSDHead):
    """SSD head whose classification loss is ``loss_cls`` (sigmoid, all anchors)."""

    def __init__(self, *args, loss_cls: Optional[dict] = None, prior_prob: float = 0.01, **kwargs):
        if kwargs.get("use_depthwise"):
            raise ValueError("FocalSSDHead: use_depthwise is not supported")
        super().__init__(*args, **kwargs)
        self.prior_prob = float(prior_prob)
        if loss_cls is None:  # SSD as published: softmax CE + hard negative mining
            self.loss_cls = None
            return
        loss_cls = dict(loss_cls)
        if not loss_cls.get("use_sigmoid", True):
            raise ValueError("FocalSSDHead: loss_cls must use sigmoid outputs (use_sigmoid=True); "
                             "set loss_cls=None for SSD's softmax cross-entropy")
        self.loss_cls = MODELS.build(loss_cls)
        self.use_sigmoid_cls = True
        self.cls_focal_loss = True
        # one logit per class, no background channel: rebuild the towers with that width
        self.cls_out_channels = self.num_classes
        self._init_layers()

    def init_weights(self) -> None:
        super().init_weights()
        if self.loss_cls is None:
            return
        bias = -math.log((1 - self.prior_prob) / self.prior_prob)
        for tower in self.cls_convs:
            torch.nn.init.constant_(tower[-1].bias, bias)

    def loss_by_feat_single(self, cls_score, bbox_pred, anchor, labels, label_weights, bbox_targets,
                            bbox_weights, avg_factor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.loss_cls is None:
            return super().loss_by_feat_single(cls_score, bbox_pred, anchor, labels, label_weights,
                                               bbox_targets, bbox_weights, avg_factor)
        # labels: class index per anchor, background = num_classes (FocalLoss converts to one-hot)
        loss_cls = self.loss_cls(cls_score, labels, label_weights, avg_factor=avg_factor)
        if self.reg_decoded_bbox:
            bbox_pred = self.bbox_coder.decode(anchor, bbox_pred)
        loss_bbox = smooth_l1_loss(bbox_pred, bbox_targets, bbox_weights, beta=self.train_cfg["smoothl1_beta"],
                                   avg_factor=avg_factor)
        return loss_cls[None], loss_bbox
