"""peftbench/tasks"""
