//! Save and restore of device state.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A component whose guest-visible state can be saved and rebuilt.
///
/// No default bodies: a device that forgets to save must not compile.
pub trait Persist: Sized {
    /// The saved state: plain data, serialized by the snapshot image.
    type State: Serialize + DeserializeOwned;
    /// What a restored object needs besides its state (event fds, files, memory).
    type ConstructorArgs;
    type Error: std::error::Error + Send + Sync + 'static;

    /// Reads the state. The caller has quiesced the component.
    fn save(&self) -> Self::State;
    /// Builds a new object from `state`, refusing anything inconsistent.
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}
