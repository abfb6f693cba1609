# SSD300 (VGG16) on Pascal VOC 07+12, 20 classes: MMDetection's own config
# (mmdet::pascal_voc/ssd300_voc0712.py: SSD300 model, VOC0712 data as RepeatDataset x10 of
# VOC2007+VOC2012 trainval, test on VOC2007 test, 24-epoch schedule, VOCMetric mAP@0.5 with
# 11-point interpolation), with the classification loss swappable for the Focal Loss family.
#
# mmdet's SSDHead hard-codes softmax cross-entropy with 3:1 hard negative mining. Here the head is
# ssflctl's FocalSSDHead (ssflctl/heads.py): sigmoid outputs, `loss_cls` over all anchors (no hard
# negative mining), normalised by the positives; SSD's anchors, assigner and Smooth-L1 unchanged.
# The seed's setting (003): Focal Loss gamma 1, alpha 0.25. `loss` takes focal/ssfl/gfl or a dict;
# `model.bbox_head.loss_cls.gamma` etc. are dotted override axes (experiments/ssd_voc_focal.yaml).
# Set `model.bbox_head.loss_cls: null` (an override) for the original CE + hard negative mining.
#
# Metric: VOCMetric, mAP at IoU 0.5 (logged as pascal_voc/mAP and pascal_voc/AP50).
# Layout under data_root: VOC2007/{Annotations,JPEGImages,ImageSets/Main/{trainval,test}.txt}
# and VOC2012/{...}/trainval.txt (the VOCdevkit folder).
_base_ = 'mmdet::pascal_voc/ssd300_voc0712.py'

custom_imports = dict(imports=['ssflctl.extensions.heads'], allow_failed_imports=False)

ssflctl_params = dict(
    loss={'type': 'FocalLoss', 'use_sigmoid': True, 'gamma': 1.0, 'alpha': 0.25, 'loss_weight': 1.0},
    lr=0.001,
    seed=0,
    data_root='data/VOCdevkit/',
    max_epochs=24,
    batch_size=8,  # per GPU, as in mmdet
    workers=3,
    img_scale=(300, 300),
    load_from=None,
    val_interval=1,
    log_interval=50,
    ckpt_interval=1,
    amp=None,  # mixed precision: 'bf16' | 'fp16' | None (ssflctl/amp.py)
)
# Template-specific params: name -> the dotted config keys they set.
ssflctl_bindings = dict(img_scale=[
    'train_dataloader.dataset.dataset.datasets.0.pipeline.4.scale',
    'train_dataloader.dataset.dataset.datasets.1.pipeline.4.scale',
    'val_dataloader.dataset.pipeline.1.scale',
    'test_dataloader.dataset.pipeline.1.scale',
])

# mmdet's test pipeline, with the ground truth kept in the metainfo ('instances'): a CocoMetric
# without ann_file (format_only) can then dump detections and a COCO copy of the VOC ground truth.
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(300, 300), keep_ratio=False),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor', 'instances')),
]
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = dict(dataset=dict(pipeline=test_pipeline))

model = dict(
    bbox_head=dict(
        type='FocalSSDHead',
        num_classes=20,
        prior_prob=0.01,
        loss_cls=ssflctl_params['loss']))

optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=ssflctl_params['lr'], momentum=0.9, weight_decay=5e-4))
randomness = dict(seed=ssflctl_params['seed'])
default_hooks = dict(
    logger=dict(type='LoggerHook', interval=ssflctl_params['log_interval']),
    checkpoint=dict(type='CheckpointHook', interval=ssflctl_params['ckpt_interval'], max_keep_ckpts=2))
