# Tiny RetinaNet for CPU smoke runs, tests and the quick start.
#
# ResNet-18 at half width (base_channels=32: 32-64-128-256 channels) trained from scratch
# (init_cfg=None: nothing is downloaded), a 64-channel FPN and a 64-channel head with GroupNorm
# (from scratch it converges several times faster than without), small images. Half width costs a
# third of the full-width iteration on one CPU core (0.15 vs 0.47 s at 192x96, batch 4) and reaches
# the same AP on the quick start's data (AP50 0.51 vs 0.53 after 16 epochs, seed 0);
# constant lr without warm-up (the setting in which the seed's SSFL* diverges at
# lr 0.01 while Focal Loss trains), and a x0.1 step after 3/4 of the epochs.
# Dataset-agnostic COCO-format data: `classes=None` takes the category names from the training
# annotation file at render time. `python -m ssflctl.convert.synth_coco` style data:
# ssflctl.convert.synth_coco.generate(root) writes a matching synthetic dataset.
_base_ = [
    'mmdet::_base_/models/retinanet_r50_fpn.py',
    'mmdet::_base_/default_runtime.py',
]

# Named parameters (name -> default) that ssflctl's renderer fills; see ssflctl/render.py.
ssflctl_params = dict(
    loss='focal',
    lr=0.01,
    seed=0,
    data_root='data/synth/',
    max_epochs=12,
    batch_size=8,
    workers=0,
    train_ann='annotations/train.json',
    train_img='images/train/',
    val_ann='annotations/val.json',
    val_img='images/val/',
    test_ann='annotations/val.json',
    test_img='images/val/',
    classes=None,
    img_scale=(96, 96),
    val_interval=None,
    log_interval=5,
    ckpt_interval=1,
    amp=None,  # mixed precision: 'bf16' | 'fp16' | None (ssflctl/amp.py)
)
# Template-specific params: name -> the dotted config keys they set.
ssflctl_bindings = dict(img_scale=[
    'train_dataloader.dataset.pipeline.2.scale',
    'val_dataloader.dataset.pipeline.1.scale',
    'test_dataloader.dataset.pipeline.1.scale',
])

data_root = ssflctl_params['data_root']
img_scale = ssflctl_params['img_scale']

model = dict(
    backbone=dict(
        depth=18,
        base_channels=32,
        frozen_stages=-1,
        norm_eval=False,  # from scratch: BN statistics must be learnt
        init_cfg=None),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    bbox_head=dict(
        num_classes=3,
        in_channels=64,
        feat_channels=64,
        stacked_convs=2,
        norm_cfg=dict(type='GN', num_groups=8, requires_grad=True),
        loss_cls=dict(
            type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25,
            loss_weight=1.0)),
    test_cfg=dict(score_thr=0.05, max_per_img=50))

dataset_type = 'CocoDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs',
         meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=ssflctl_params['batch_size'],
    num_workers=0,
    persistent_workers=False,
    sampler=dict(type='DefaultSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file=ssflctl_params['train_ann'],
        data_prefix=dict(img=ssflctl_params['train_img']),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file=ssflctl_params['val_ann'],
        data_prefix=dict(img=ssflctl_params['val_img']),
        test_mode=True,
        pipeline=test_pipeline))
test_dataloader = dict(
    batch_size=8,
    num_workers=0,
    persistent_workers=False,
    drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        ann_file=ssflctl_params['test_ann'],
        data_prefix=dict(img=ssflctl_params['test_img']),
        test_mode=True,
        pipeline=test_pipeline))
val_evaluator = dict(type='CocoMetric', ann_file=data_root + ssflctl_params['val_ann'], metric='bbox')
test_evaluator = dict(type='CocoMetric', ann_file=data_root + ssflctl_params['test_ann'], metric='bbox')

max_epochs = ssflctl_params['max_epochs']
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=max_epochs)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

# constant lr (no warm-up), x0.1 after 3/4 of the epochs (ssflctl scales the milestone with max_epochs)
param_scheduler = [
    dict(type='MultiStepLR', begin=0, end=max_epochs, by_epoch=True,
         milestones=[int(0.75 * max_epochs)], gamma=0.1),
]
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='SGD', lr=ssflctl_params['lr'], momentum=0.9, weight_decay=0.0001))

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=ssflctl_params['log_interval']),
    checkpoint=dict(type='CheckpointHook', interval=ssflctl_params['ckpt_interval'], max_keep_ckpts=2))
log_processor = dict(type='LogProcessor', window_size=5, by_epoch=True)
randomness = dict(seed=ssflctl_params['seed'])
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
