"""MDEQ networks: ``get_cls_net(cfg)`` and ``get_seg_net(cfg)`` build them from a config."""
from .mdeq import MDEQClsNet, MDEQSegNet, deq_kwargs, get_cls_net, get_seg_net, input_channels
from .mdeq_core import MDEQModule, MDEQNet

__all__ = ["MDEQClsNet", "MDEQSegNet", "MDEQModule", "MDEQNet", "deq_kwargs", "get_cls_net", "get_seg_net",
           "input_channels"]
