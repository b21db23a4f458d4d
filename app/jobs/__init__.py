"""Training jobs, torch-free: training data and options, the job row's rules (claims, leases, events), the queue
interface and the recovery sweep. The services create jobs with it; app/training runs them."""
