"""Pre-training: settings (`config`), the plan (`plan`), shards into packed windows (`data`), the loss (`loss`),
the optimizer (`optim`), the LightningModule (`module`), callbacks, samples, reports, the run (`run`), the CLI."""
