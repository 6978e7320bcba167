"""The model registries: their index and records, registering a training run's models (dev), and
promoting them by rule into production."""
