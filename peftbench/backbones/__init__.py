"""peftbench/backbones"""
