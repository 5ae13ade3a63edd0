"""The embedded default model: a tiny Wan-architecture video DiT trained on procedural clips.

It ships with the package so that every command has a model to work on with no download, and its
attention has the real spatio-temporal structure that SLA2 exploits. Modules: `config` (architecture,
default clip, shipped files), `synthetic` (the procedural clips), `loading` (build, load, example inputs),
`attention_stats` (how concentrated its attention is), `train` (how the shipped weights were made).
"""
