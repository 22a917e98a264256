"""Who gets a GPU and when: policy, quota ledger, scheduler, node daemon and its client, status (step 2)."""
