"""What is measured after training: evaluation, reports, open-set and zero-shot scores."""
