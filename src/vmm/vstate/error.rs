//! KVM failures, each naming the ioctl (and, for /dev/kvm, what to do).

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm ({0}): --accel kvm needs KVM; check that /dev/kvm exists and that you \
         may read and write it (e.g. add yourself to the `kvm` group), or run the guest without KVM \
         with --accel bt"
    )]
    OpenKvm(kvm_ioctls::Error),
    #[error("{ioctl} failed: {source}")]
    Ioctl {
        ioctl: &'static str,
        source: kvm_ioctls::Error,
    },
}

pub type Result<T> = std::result::Result<T, VmError>;

/// Names the ioctl behind a `kvm_ioctls` error.
pub trait IoctlContext<T> {
    fn ioctl(self, name: &'static str) -> Result<T>;
}

impl<T> IoctlContext<T> for std::result::Result<T, kvm_ioctls::Error> {
    fn ioctl(self, ioctl: &'static str) -> Result<T> {
        self.map_err(|source| VmError::Ioctl { ioctl, source })
    }
}
