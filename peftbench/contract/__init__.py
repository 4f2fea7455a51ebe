"""peftbench/contract"""
