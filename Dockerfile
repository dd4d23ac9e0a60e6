FROM python:3.11-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends qemu-utils libnbd-bin nbdfuse \
      fuse3 e2fsprogs lvm2 fdisk xfsprogs \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir .
EXPOSE 8000
