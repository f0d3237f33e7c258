"""Scale-out backends: adapters that hand the ZO core local parameter shards and reduce losses across ranks.

Each backend imports its distributed library (DeepSpeed, ...) at module top, so import the backend module
itself (``from zo_scale.backends import zero3``); ``import zo_scale`` never loads one.
"""
