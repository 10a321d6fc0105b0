"""What runs tickpipe as processes: the local stack and cluster, demo, feeder, chaos, bench."""
