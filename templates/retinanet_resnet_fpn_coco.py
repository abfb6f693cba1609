# RetinaNet ResNet-{18,34,50,101,152}-FPN on COCO with SGD or Adam: MMDetection's own R50-FPN 1x
# config, with two axes that carry derived settings (declared once, below, in `ssflctl_derived`):
#   depth      ResNet depth; also the FPN input channels (18/34: 64..512, 50+: 256..2048) and the
#              ImageNet checkpoint of that depth (torchvision://resnet<depth>)
#   optimizer  'sgd' (momentum 0.9, weight decay 1e-4, lr 0.01: mmdet's RetinaNet) or 'adam'
#              (weight decay 0, lr 1e-4: the seeds' setting); an explicit `lr` (param or matrix
#              axis) overrides the optimizer's default lr
# The seed 002 study (depth 18..152, Adam lr 1e-3..1e-5, seed 3407 vs another, 20-80 epochs):
# experiments/retinanet_depth_sweep.yaml.
_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'

ssflctl_params = dict(
    loss='focal',
    lr=0.01,
    seed=0,
    depth=50,
    optimizer='sgd',
    data_root='data/coco/',
    max_epochs=12,
    batch_size=2,  # per GPU, as in mmdet
    workers=2,
    train_ann='annotations/instances_train2017.json',
    train_img='train2017/',
    val_ann='annotations/instances_val2017.json',
    val_img='val2017/',
    test_ann='annotations/instances_val2017.json',
    test_img='val2017/',
    load_from=None,
    auto_scale_lr=False,
    log_interval=50,
    ckpt_interval=1,
    amp=None,  # mixed precision: 'bf16' | 'fp16' | None (ssflctl/amp.py)
)

ssflctl_derived = dict(
    depth={
        18: {'model.backbone.depth': 18, 'model.neck.in_channels': [64, 128, 256, 512],
             'model.backbone.init_cfg': dict(type='Pretrained', checkpoint='torchvision://resnet18')},
        34: {'model.backbone.depth': 34, 'model.neck.in_channels': [64, 128, 256, 512],
             'model.backbone.init_cfg': dict(type='Pretrained', checkpoint='torchvision://resnet34')},
        50: {'model.backbone.depth': 50, 'model.neck.in_channels': [256, 512, 1024, 2048],
             'model.backbone.init_cfg': dict(type='Pretrained', checkpoint='torchvision://resnet50')},
        101: {'model.backbone.depth': 101, 'model.neck.in_channels': [256, 512, 1024, 2048],
              'model.backbone.init_cfg': dict(type='Pretrained', checkpoint='torchvision://resnet101')},
        152: {'model.backbone.depth': 152, 'model.neck.in_channels': [256, 512, 1024, 2048],
              'model.backbone.init_cfg': dict(type='Pretrained', checkpoint='torchvision://resnet152')},
    },
    optimizer={
        'sgd': {'optim_wrapper.optimizer': dict(type='SGD', lr=0.01, momentum=0.9, weight_decay=0.0001)},
        'adam': {'optim_wrapper.optimizer': dict(type='Adam', lr=0.0001, weight_decay=0.0)},
    },
)
