"""peftbench/running"""
