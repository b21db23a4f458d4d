"""The prefix catalog, torch-free: naming a version (`name@version`), finding it for a tenant, publishing and
deleting versions with their blobs. Shared by the services (requests) and app/training (published results)."""
