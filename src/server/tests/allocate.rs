//! Binding, authentication, Allocate and Refresh.

use super::*;

#[test]
fn binding_answers_with_xor_mapped_address() {
    let mut h = Harness::new();
    let out = h.request(client(1), Method::BINDING, &[], None);
    let m = out.one().msg();
    assert_eq!(
        m.message_type(),
        MessageType::new(Method::BINDING, Class::Success)
    );
    assert_eq!(m.attrs.xor_mapped_address, Some(client(1).client));
    assert_eq!(out.one().dst, client(1).client);
    assert_eq!(out.one().src, client(1).server);
    assert!(out.commands.is_empty());
}
