"""h2k: move virtual machine disks from VMware and Hyper-V onto KVM.

The package holds the domain and nothing of Flask or Celery: job schemas,
the state table, the Redis store, capability rules, the disk operations and
the tools they wrap.
"""

__version__ = "0.1.0"
