//! The devices a server runs MMDetection work on: its GPUs, or CPU slots when it has none.
//! A run holds one slot for its whole life, so runs on one GPU are serialised (as the seed's
//! were) and N GPUs run N at once.

use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Gpu(u32),
    /// One of the CPU slots (index only distinguishes them).
    Cpu(usize),
}

impl Device {
    /// The device string torch/mmdet expects inside the subprocess. A GPU is always `cuda:0`
    /// there because `CUDA_VISIBLE_DEVICES` exposes only that one GPU.
    pub fn torch_device(self) -> &'static str {
        match self {
            Device::Gpu(_) => "cuda:0",
            Device::Cpu(_) => "cpu",
        }
    }

    /// The value of `CUDA_VISIBLE_DEVICES` for the subprocess (empty hides every GPU).
    pub fn cuda_visible_devices(self) -> String {
        match self {
            Device::Gpu(index) => index.to_string(),
            Device::Cpu(_) => String::new(),
        }
    }

    pub fn describe(self) -> String {
        match self {
            Device::Gpu(index) => format!("gpu:{index}"),
            Device::Cpu(_) => "cpu".into(),
        }
    }
}

/// Free device slots; a taken slot returns to the pool when its [`DeviceLease`] drops.
#[derive(Debug, Clone)]
pub struct DevicePool {
    free: Arc<Mutex<Vec<Device>>>,
}

impl DevicePool {
    /// `gpus` as configured, or detected when None; CPU slots only when there are no GPUs.
    pub fn new(gpus: Option<&[u32]>, cpu_slots: usize) -> Self {
        let gpus = gpus.map_or_else(detect_gpus, <[u32]>::to_vec);
        let mut devices: Vec<Device> = if gpus.is_empty() {
            (0..cpu_slots.max(1)).map(Device::Cpu).collect()
        } else {
            gpus.into_iter().map(Device::Gpu).collect()
        };
        // Taken from the end: keep the lowest index first.
        devices.reverse();
        tracing::info!(devices = ?devices, "device slots");
        Self {
            free: Arc::new(Mutex::new(devices)),
        }
    }

    pub fn free_count(&self) -> usize {
        self.free.lock().map_or(0, |free| free.len())
    }

    pub fn try_take(&self) -> Option<DeviceLease> {
        let device = self.free.lock().ok()?.pop()?;
        Some(DeviceLease {
            device,
            pool: self.clone(),
        })
    }
}

#[derive(Debug)]
pub struct DeviceLease {
    pub device: Device,
    pool: DevicePool,
}

impl Drop for DeviceLease {
    fn drop(&mut self) {
        if let Ok(mut free) = self.pool.free.lock() {
            free.push(self.device);
        }
    }
}

/// GPU indices from `nvidia-smi -L` ("GPU 0: NVIDIA H200 (UUID: ...)"); none without it.
pub fn detect_gpus() -> Vec<u32> {
    let Ok(output) = std::process::Command::new("nvidia-smi").arg("-L").output() else {
        return Vec::new();
    };
    if !output.status.success() {
        return Vec::new();
    }
    parse_nvidia_smi_list(&String::from_utf8_lossy(&output.stdout))
}

fn parse_nvidia_smi_list(text: &str) -> Vec<u32> {
    text.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("GPU ")?;
            rest.split(':').next()?.trim().parse().ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvidia_smi() {
        let text = "GPU 0: NVIDIA H200 (UUID: GPU-1)\nGPU 1: NVIDIA H200 (UUID: GPU-2)\n";
        assert_eq!(parse_nvidia_smi_list(text), vec![0, 1]);
    }

    #[test]
    fn slots_return_on_drop() {
        let pool = DevicePool::new(Some(&[3]), 1);
        let lease = pool.try_take().expect("one slot");
        assert_eq!(lease.device, Device::Gpu(3));
        assert_eq!(lease.device.cuda_visible_devices(), "3");
        assert!(pool.try_take().is_none());
        drop(lease);
        assert_eq!(pool.free_count(), 1);
    }
}
