"""Adapters: parameter-efficient fine-tuning, where ZO trains a few added weights and the base model stays frozen.

Each adapter module imports its library (peft, ...) at module top, so import the module itself
(``from zo_scale.adapters import peft_tuning``); ``import zo_scale`` never loads one.
"""
