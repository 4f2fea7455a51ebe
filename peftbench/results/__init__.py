"""peftbench/results"""
