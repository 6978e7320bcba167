"""The models: features, the candidates (one table), per-partition and global models, training
and the choice between candidates, the stored bundle and the one artifact format it is written in."""
